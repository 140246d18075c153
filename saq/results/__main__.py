from saq.results.cli import main

raise SystemExit(main())

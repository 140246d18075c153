from saq.cli.ptq import main

if __name__ == "__main__":
    main()

"""Tables from finished runs: ``python -m saq.results`` (sweep table, ``compare``, ``collect``, ``cost``)."""

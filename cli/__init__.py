"""The ``carlzoo`` command line (``carlzoo.cli``)."""

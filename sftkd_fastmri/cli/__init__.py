"""Command-line interface (``sftkd-fastmri``)."""

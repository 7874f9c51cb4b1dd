"""Command line: argv -> config objects -> domain calls. Only this package parses argv."""

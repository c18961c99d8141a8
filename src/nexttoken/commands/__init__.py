"""One module per command of the ``nexttoken`` command line (dispatched by :mod:`nexttoken.cli`): the
only layer that knows how a setting is spelled as a flag."""

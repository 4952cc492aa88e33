"""One base for every error dlibbridge raises about its input or its outputs.

Each module keeps its own exception class beside the code that raises it (the message names
what to change); all of them derive from :class:`DlibbridgeError`, so a caller — the command
line above all — can tell "the input or the request is wrong" (one line, exit code 2) from a
bug (a traceback).  Each class also keeps the builtin base it always had (``ValueError`` for
``DlibFormatError`` and most others), so existing ``except`` clauses keep working.
"""


class DlibbridgeError(Exception):
    """Bad input or an impossible request; the message is one line for the user."""


class ConversionError(DlibbridgeError, ValueError):
    """A dlib file or module that cannot be mapped exactly; the message names the dlib
    layer (``layer<i>``) and/or the torch module concerned.  Here, below the converters, so that
    every converter (the face ResNet's and the generic one) raises the same class without
    importing one another."""

"""The one exception type of the converter: bad input, with a one-line reason.

Every reader, hook and writer raises :class:`CheckpointError` for anything wrong with a source
checkpoint (missing tensor, wrong shape or dtype, truncated file, unreadable index, a config that
contradicts the tensors, an unsupported quantization type). The message names the file and the
tensor; ``python -m jaxwint2.convert`` prints it and exits with status 2.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A source checkpoint we cannot read or convert; the message names file and tensor."""

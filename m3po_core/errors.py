class M3POError(Exception):
    """Base class for errors the pipeline reports to users."""

class InputError(M3POError):
    """Bad input data: the message names the file, row or field at fault."""

class ArgumentError(M3POError, ValueError):
    """A bad command-line or API argument (a run id, a root): the message names it."""

class ConfigError(M3POError):
    """Bad configuration: the message names the key at fault."""

class Interrupted(M3POError):
    """The run was interrupted (Ctrl-C): shards not started yet are left for a re-run."""

class AdapterNoOp(InputError):
    """A trained adapter that leaves the model's outputs unchanged: evaluating it would report the base
    model's numbers as the trained ones (m3po_core/evaluation/adapter_check.py)."""

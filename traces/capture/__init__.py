"""Recording moesim traces from a running Hugging Face MoE model (``moesim capture``).

The recorder hooks each MoE layer's router (read-only forward hooks), runs batched generation
with ``transformers``, and streams one trace row per (real token, MoE layer) to Parquet:
the experts the router chose, in rank order, with their gate weights, for the prefill and for
every decode step. ``docs/capture.md`` is the user guide.

Modules, one job each:

- :mod:`traces.capture.deps`: importing the optional ``torch``/``transformers`` extra;
- :mod:`traces.capture.routers`: finding each architecture's routers and reading their choices;
- :mod:`traces.capture.meta`: the trace metadata from the model (layers, experts, bytes);
- :mod:`traces.capture.lookahead`: the gate-lookahead predictions (``pred_h{H}`` columns);
- :mod:`traces.capture.recorder`: hooks, step bookkeeping and the generation loop;
- :mod:`traces.capture.sink`: streaming the rows to a file (or a folder of parts);
- :mod:`traces.capture.prompts`: reading prompt files; :mod:`traces.capture.loading`: loading
  a model from local files only.

Nothing here imports torch at import time of this package; the submodules that need it do.
"""

from traces.errors import MoesimError


class CaptureError(MoesimError):
    """The model or its generation did not behave as the recorder expects (one-line message)."""

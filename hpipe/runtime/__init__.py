"""Running plans for real with torch: model units, weights, stage workers, launcher.

Everything that imports torch lives under this package, so planning and
simulating work without it.  ``execute`` (``launcher.py``) is the entry point
behind ``hpipe execute``:

* ``model.py``    -- LLaMA and GPT as partition units, with KV cache and tensor parallelism
* ``weights.py``  -- seeded random weights, or a Hugging Face safetensors folder
* ``worker.py``   -- one process per plan device: the stage loop over send/recv
* ``launcher.py`` -- starts and supervises the workers, builds the measured Result
* ``torchrun.py`` -- the same run across several hosts, started by torchrun
* ``decode.py``   -- generation: the decode step loop of the stage workers
* ``sampling.py`` -- greedy and seeded temperature / top-k / top-p sampling
* ``generation.py`` -- generation on the launcher's side: tokenizer, prompts, the one-process reference
"""

import torch  # noqa: F401  (fail here, where the CLI turns a missing torch into a clear message)

from hpipe.runtime.launcher import CHECK_TOLERANCE, execute, load_inputs

__all__ = ["CHECK_TOLERANCE", "execute", "load_inputs"]

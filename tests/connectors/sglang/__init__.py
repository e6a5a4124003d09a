"""SGLang's package ``__init__`` imports CUDA-only dependencies (triton, torchvision, ...), but
its HiCache storage modules (``hicache_storage``, ``storage.backend_factory``) need only torch.
Importing this test package registers the installed ``sglang`` package without running its
``__init__``, so those real modules import in every module below; nothing of SGLang is copied.
"""

import importlib.util
import sys
import types

if importlib.util.find_spec("sglang") is None:
    raise ImportError("sglang is not installed: bash tests/setup.sh installs it (--no-deps)")
if "sglang" not in sys.modules:
    _spec = importlib.util.find_spec("sglang")
    _pkg = types.ModuleType("sglang")
    _pkg.__path__ = list(_spec.submodule_search_locations)
    _pkg.__spec__ = _spec
    sys.modules["sglang"] = _pkg

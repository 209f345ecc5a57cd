"""FP64 streaming merge tools: methods registry, MBW block maps, TOML recipes, a memory-bounded engine.

Entry points: ``merge_tools.engine.merge(recipe, output, options)``, ``merge_tools.recipe.load_recipe(path)``,
``merge_tools.recipe.single_method(name, inputs, params)``, ``merge_tools.methods.get(name)`` (pure tensor
functions), and the ``sd-merge`` CLI (``merge_tools.cli.main``).
"""

import os as _os

# Large temporaries: 2 MiB pages make fresh allocations ~2x cheaper (fewer page faults). Read by torch's CPU
# allocator; effective when merge_tools is imported before torch (the CLI), harmless otherwise.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# Idle OpenMP workers sleep instead of spinning between the many short element-wise kernels: on a busy
# machine spinning threads steal the cores doing the work (measured: 2x wall time on a loaded 2-core box).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

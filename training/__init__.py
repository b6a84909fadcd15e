"""Offline training for steerserve: RED edit vectors and RAHF preference representations.

Modules, one concept each:

* :mod:`training.cli` - ``steerserve train red|rahf``; :mod:`training.config` - their options, each
  declared once; :mod:`training.options` - the command line generated from those dataclasses.
* :mod:`training.red` - RED; :mod:`training.rahf` - RAHF (one module per step).
* :mod:`training.records`, :mod:`training.formats`, :mod:`training.loaders` - the data model, the file
  formats and the loading of training data; :mod:`training.demo` - the shipped demo sets.
* :mod:`training.tokens` - tokenisation and batching; :mod:`training.forward` - response loss and
  hidden-state capture; :mod:`training.lora` - LoRA adapters on hooks.
* :mod:`training.loop` - the optimisation loop; :mod:`training.checkpoint` - its checkpoints;
  :mod:`training.runlog` - loss log and plot; :mod:`training.runtime` - threads, seeds, accelerator,
  base model; :mod:`training.artifacts` - the artifacts' training metadata.
"""

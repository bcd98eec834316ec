"""FlashU: training-free, task-aware accelerations that turn a Show-o2 into a task specialist.

Each technique is its own file and takes a built Show-o2 (it never edits showo2's code): `wanda.py` (calibration
scores), `ffn_prune.py` (neuron reordering and physically smaller FFN matmuls), `layer_skip.py`, `plan.py`
(per-step schedule: hybrid FFN, layer skipping, diffusion-head cache, guidance), `generation.py` (the T2I step that
follows the plan), `artifact.py` (saving and loading a specialization).
"""

"""twla_offline: the TWLA post-training quantizer (HF model + calibration text -> TWLA checkpoint).

Stages, in data-flow order: calibrate -> rotate -> ternarize -> allocate bits -> clip -> export.
The checkpoint layout comes from `twla_vllm.format`, the only contract with the runtime.
"""

"""lm-eval task definitions built from the held-out Brown test split (the text `twla-eval` scores).

    twla-lm-eval --model vllm --model_args pretrained=DIR,gpu_memory_utilization=0.3 \\
        --tasks twla_brown --include_path "$(python3 -m twla_offline.lm_eval_tasks)"

The documents are generated from the packaged text when a task loads (`brown.py`): nothing comes from the
hub. `python3 -m twla_offline.lm_eval_tasks` prints this directory.
"""

import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))

"""One worker of an Optuna study: ``python -m lmref.tuning --config JSON --space module:SPACE
--objective module:factory [--objective-kwargs JSON] [--worker-id N]`` (see
``lmref.tuning.workers``; ``run_workers`` starts several).

Usage::

    python -m lmref.tuning --config '{"name": "lora", "storage": "lora.journal"}' \\
        --space mypkg.search:SPACE --objective mypkg.search:make_objective --worker-id 1
"""

from lmref.tuning.workers import main

if __name__ == "__main__":
    main()

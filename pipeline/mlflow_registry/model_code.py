"""The logged RLFN pyfunc's code (MLflow "models from code"): ``log_and_register`` passes this
file as ``python_model``; MLflow copies it into the model and runs it on load, with the
model's ``code/`` folder (``pipeline/mlflow_registry`` and ``rlfn``) first on ``sys.path``.
The model is built from code, and its weights come from the ``weights`` artifact
(safetensors): loading a registered version unpickles nothing.

Not imported by the package itself (``set_model`` is a side effect of running it)."""

import mlflow

from pipeline.mlflow_registry.pyfunc import RLFNPyfunc

mlflow.models.set_model(RLFNPyfunc())

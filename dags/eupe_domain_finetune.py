"""A domain fine-tune, started from the Airflow UI's form (no schedule): the FINETUNE graph.

The form's fields are typed and validated before any task runs (components.airflow_params.finetune_form);
the model is published under the domain's own model_name.
"""

from components.airflow_dag import build_dag
from components.airflow_params import finetune_form
from components.graph import FINETUNE

dag = build_dag(FINETUNE, schedule=None, params=finetune_form(FINETUNE))

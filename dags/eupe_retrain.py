"""Scheduled retraining (weekly, and when the training dataset gets a new version): the RETRAIN graph.

Steps, edges, resources and retries come from components.graph; the mode (embedded / cluster), the
artifact root, the image and the schedule are Airflow Variables (see components.airflow_dag.Settings).
"""

from components.airflow_dag import build_dag, retrain_schedule
from components.graph import RETRAIN

dag = build_dag(RETRAIN, schedule=retrain_schedule(RETRAIN))

"""The paper's ablation as a DAG (triggered from the UI, no schedule): stage 2 only vs stages 1+2 vs 1+2+3 vs a
teaching assistant, per seed, then the table (mean +- std) and its PNG: the ABLATION graph of components.graph."""

from components.airflow_dag import build_dag
from components.graph import ABLATION

dag = build_dag(ABLATION, schedule=None)

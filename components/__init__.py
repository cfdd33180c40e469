"""The EUPE step graph (``components.graph``) and what runs it: ``components.run`` resolves a step's
command line for one pipeline run, ``components.local`` runs a whole pipeline in this environment.
Airflow (``dags/``) and Kubeflow build their tasks from the same graph."""

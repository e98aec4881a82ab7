"""Where the steps run: what the DAG files share, Airflow on one machine, and Airflow scaled out.

``orchestration`` is imported by the DAG files at parse time (standard library and config only);
``airflow_home`` is the project's Airflow home (environment, database, ``make ui``); ``local_airflow`` runs
the DAGs for ``make run``; ``cluster`` starts Airflow on PostgreSQL with Celery workers. The only package
that may import every stage.
"""

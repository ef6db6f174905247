"""Storage: the tamper-evident lineage, agent memory, parameter schemas and migrations.

The only room that speaks SQL. The run's side never imports it (it holds no
lineage credentials); the worker and the operator tools do.
"""

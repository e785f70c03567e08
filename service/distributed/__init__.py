"""Work across machines on Ray (the `ray` extra): exact attention with its keys split over a
Ray cluster's workers (attention.py), on the cluster that cluster.py connects to.

A layer beside service.render: on top of the compute core (whose split-KV pieces,
service.core.split, the workers run), below the web layer; Ray is imported only here.
"""

"""Study: ``medadv bench``, networks x cases x probes x strengths as resumable cells, run locally or on Dask,
scored and written as tables, figures and a report."""

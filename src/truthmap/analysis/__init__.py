"""What is read from a run directory, without the model: probes and their solver, the heatmap, controls and the
verdict, the detection table and its metrics, detectors, error types, answer selection and the report."""

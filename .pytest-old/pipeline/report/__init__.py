"""What a run reports: metrics, plots, Grad-CAM heatmaps, and MLflow tracking."""

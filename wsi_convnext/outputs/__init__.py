"""What the pipeline hands to people and other tools: QC pictures, heatmaps, the cohort
report, feature exports and the run manifest."""

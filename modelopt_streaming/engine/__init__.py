"""Engine: runs the source model one decoder layer at a time with transformers' own modules (calibration, evaluate)."""

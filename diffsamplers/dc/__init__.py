"""DC-Solver's learned parts: ratio search, ratio files, cascade polynomial regression, evaluation."""

"""What runs a model to learn something: the Align Your Steps optimiser and its KLUB, DC-Solver's ratio search."""

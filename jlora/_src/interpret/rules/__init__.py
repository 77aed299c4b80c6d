"""The evaluator's rules, one concept a module, collected into one table by `interpret.evaluator`."""

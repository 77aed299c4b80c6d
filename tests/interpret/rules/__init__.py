"""Tests of `jlora._src.interpret.rules`, one file per rule module."""

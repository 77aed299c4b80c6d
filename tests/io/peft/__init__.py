"""Tests of `jlora._src.io.peft`, one file per module."""

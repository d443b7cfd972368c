"""Run time: launcher.py starts tp worker processes (worker.py) that talk to it over channel.py."""

"""Run time: launcher.py starts tp worker processes (worker.py) that talk to it over channel.py.

The values a worker accepts, here so that config validation need not import the worker:"""
DEVICES = ("cpu", "cuda")
COLLECTIVES = ("auto", "gloo", "nccl")  # auto: gloo on cpu, nccl on cuda

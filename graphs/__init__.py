"""Model definitions named by conf/model/*.yaml. They know nothing of parallelism."""

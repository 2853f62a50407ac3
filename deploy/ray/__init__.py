"""The loraloop services as Ray actors: `python -m deploy.ray.launcher --help`.

`plan` (command line, configs) and `launcher` import Ray only once they start it; `actors`
holds the actor classes that the workers import.
"""

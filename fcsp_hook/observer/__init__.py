"""fcsp-observer: the host-wide daemon that shares every GPU among its tenants."""

# What the observer publishes for fcspctl, under paths.run_dir (one JSON object).
STATE_FILE = "observer.json"

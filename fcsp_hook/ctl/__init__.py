"""fcspctl: the operator's command line (status, top, set, doctor, install)."""

"""lm-evaluation-harness tasks on any model nexttoken loads: the adapter (:mod:`.adapter`), request
planning (:mod:`.requests`), task lookup and the run (:mod:`.tasks`), results (:mod:`.results`), and
the offline switch (:mod:`.offline`)."""

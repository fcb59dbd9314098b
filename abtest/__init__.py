"""The simulated A/B test: traffic from the world's users (traffic.py), its analysis (analysis.py),
one experiment end to end (experiment.py) and the promotion policy (promotion.py). No Ray at
import; the jobs (jobs/abtest.py, jobs/promote.py, jobs/loop.py) are thin callers."""

"""
nestproto's tests, run with C{python -m twisted.trial tests}.

Hypothesis profiles: C{dev} (default) and C{ci}, chosen with
C{HYPOTHESIS_PROFILE}.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

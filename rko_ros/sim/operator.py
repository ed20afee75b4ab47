"""The simulated operator: a person who wants one fold style, done well, and says so.

It answers the same two questions a person answers through the feedback services: is this episode
desirable (`label`), and is this episode better than that one (`prefers`). Imports the sim's
evaluate/styles modules only (numpy).
"""
from rko_ros.errors import ConfigError
from rko_ros.sim.evaluate import DEFAULT_QUALITY_THRESHOLD
from rko_ros.sim.styles import get_style


class SimulatedOperator:
    """Labels by style and quality; `results` are `evaluate.FoldResult`s."""

    def __init__(self, preferred_style, quality_threshold=DEFAULT_QUALITY_THRESHOLD):
        get_style(preferred_style)          # raises ConfigError naming the known styles
        if not 0.0 <= float(quality_threshold) <= 1.0:
            raise ConfigError(f'operator quality_threshold={quality_threshold} must be in [0, 1]')
        self.preferred_style = preferred_style
        self.quality_threshold = float(quality_threshold)

    def label(self, result):
        """True (desirable) when the fold is the preferred style and good enough."""
        return result.style == self.preferred_style and result.quality >= self.quality_threshold

    def score(self, result):
        """Orders results: desirable above preferred-but-sloppy above any other style; quality
        breaks ties within each group."""
        group = 2.0 if self.label(result) else 1.0 if result.style == self.preferred_style else 0.0
        return group + float(result.quality)

    def prefers(self, result_a, result_b):
        """True when `result_a` is preferred over `result_b` (ties go to `result_b`)."""
        return self.score(result_a) > self.score(result_b)

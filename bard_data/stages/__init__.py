"""The stages of a build, one module per table. ``STAGES`` is the registry: adding or removing a
stage is its module and one line here; the runner orders them by the tables they read (each
stage's ``reads``; the README's architecture section has the table).

    problems -> imported_samples, teacher_samples -> gold_chains -> compressions -> judgments
             -> filtered_compressions -> sft (and its balance report);  rl from problems, samples, gold_chains
"""

from bard_data.stages.compress import CompressStage
from bard_data.stages.filter import FilterStage
from bard_data.stages.gold import GoldStage
from bard_data.stages.judge import JudgeStage
from bard_data.stages.problems import ProblemsStage
from bard_data.stages.rl import RLStage
from bard_data.stages.sft import SFTStage
from bard_data.stages.teacher import TeacherStage
from bard_data.stages.traces import TracesStage

# Imported traces before the teacher: a trace file that does not match its mapping stops the build
# before any LLM call.
STAGES = (ProblemsStage(), TracesStage(), TeacherStage(), GoldStage(), CompressStage(), JudgeStage(),
          FilterStage(), SFTStage(), RLStage())

__all__ = ["STAGES"]

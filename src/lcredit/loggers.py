"""Lightning's CSV logger, except that a resumed run continues the metrics.csv of the run it
resumes (Lightning's writer deletes a metrics.csv it finds, losing the first segment), without
the rows of the partial epoch the checkpoint does not cover (they are logged again)."""
import csv
import io

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from lcredit.files import atomic_write


def _covered(row: dict, step: int, epochs_done: int) -> bool:
    """A row the checkpoint (at ``step``, after ``epochs_done`` epochs) accounts for."""
    try:
        s = int(float(row.get("step") or 0))
    except ValueError:
        return True
    if s != step:
        return s < step
    epoch = row.get("epoch")
    return not epoch or int(float(epoch)) < epochs_done  # the next epoch's first step: not yet


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_point: tuple[int, int]) -> None:
        super().__init__(log_dir)
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            self.metrics_keys = list(reader.fieldnames or [])
            rows = [r for r in reader if _covered(r, *resume_point)]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.metrics_file_path, text.getvalue())  # a failure keeps the old file

    def _check_log_dir_exists(self) -> None:
        """Keep what is there: rows go after it (a header that grows is rewritten with it)."""


class CSVLogger(_CSVLogger):
    """``resume_point``: (global step, epochs done) of the checkpoint a run resumes from."""

    def __init__(self, *args, resume_point=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_point = resume_point

    @property
    def experiment(self):
        if self._experiment is None and self.resume_point is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, tuple(self.resume_point))
        return super().experiment

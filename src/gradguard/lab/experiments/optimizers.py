from gradguard.lab.experiment import ExperimentInfo, Result

INFO = ExperimentInfo(id="optimizers", seeds=(), title="todo", summary="todo", run=lambda ctx: Result({}, {}, []))

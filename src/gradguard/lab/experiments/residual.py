from gradguard.lab.experiment import ExperimentInfo, Result

INFO = ExperimentInfo(id="residual", seeds=(), title="todo", summary="todo", run=lambda ctx: Result({}, {}, []))

from gradguard.lab.experiment import ExperimentInfo, Result

INFO = ExperimentInfo(id="deep-init", seeds=(), title="todo", summary="todo", run=lambda ctx: Result({}, {}, []))

from gradguard.lab.experiment import ExperimentInfo, Result

INFO = ExperimentInfo(id="activations", seeds=(), title="todo", summary="todo", run=lambda ctx: Result({}, {}, []))

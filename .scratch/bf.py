import sys, numpy as np, keras
from pipeline.model import networks
from pipeline.config import HeadParams, ModelParams
from pipeline.stages.train import exported
policy = sys.argv[1]
params = ModelParams(backbone="resnet50", weights="none", image_size=32, alpha=None, precision="float32", head=HeadParams(dense_units=8, dropout=0.1))
x_train = np.random.default_rng(0).normal(size=(10, 2048)).astype("float32")
images = np.random.default_rng(1).integers(0, 255, (2, 40, 50, 3), dtype="uint8")
for seed in range(6):
    keras.utils.set_random_seed(seed)
    with networks.dtype_policy(policy):
        extractor = networks.feature_extractor(params)
        head = networks.head(networks.standardization(x_train), 3, params.head)
        trained = networks.classifier(extractor, head, 32)
        model = exported(params, extractor, head)
    a = model.predict(images, verbose=0); b = trained.predict(images, verbose=0)
    print(policy, seed, float(np.abs(a-b).max()), a.argmax(1), b.argmax(1), flush=True)

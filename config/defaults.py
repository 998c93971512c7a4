"""Default configuration (yacs) with the published SVLL-ReID / CLIP-ReID key names.

Every key a YAML file or a command-line override may set must exist here; yacs rejects
unknown keys. Allowed values of choice keys are listed in ``config.validate``.
"""
from yacs.config import CfgNode as CN

_C = CN()

# ----------------------------------------------------------------------------- MODEL
_C.MODEL = CN()
_C.MODEL.DEVICE = "cuda"            # 'cuda', 'cuda:N' (refused without a usable CUDA), 'cpu' or 'auto' (CUDA if usable)
_C.MODEL.DEVICE_ID = "0"
_C.MODEL.NAME = "ViT-B-16"          # 'ViT-B-16' or 'RN50'
_C.MODEL.LAST_STRIDE = 1
_C.MODEL.PRETRAIN_PATH = ""         # CLIP weights; empty -> ~/.cache/clip/<NAME>.pt
_C.MODEL.PRETRAIN_CHOICE = "imagenet"  # kept for published configs; unused
# 'pretrained': load CLIP weights (PRETRAIN_PATH or the cache folder);
# 'random': build the named architecture with random init (demo / tests), loudly logged.
_C.MODEL.CLIP_INIT = "pretrained"
# Architecture overrides for a random-init CLIP (0 = the named architecture's value).
# RN50: VISION_WIDTH is the stem width, VISION_LAYERS the bottleneck blocks in each of the 4 stages.
_C.MODEL.CLIP_ARCH = CN()
_C.MODEL.CLIP_ARCH.EMBED_DIM = 0
_C.MODEL.CLIP_ARCH.VISION_WIDTH = 0
_C.MODEL.CLIP_ARCH.VISION_LAYERS = 0
_C.MODEL.CLIP_ARCH.VISION_PATCH_SIZE = 0
_C.MODEL.CLIP_ARCH.TEXT_WIDTH = 0
_C.MODEL.CLIP_ARCH.TEXT_HEADS = 0
_C.MODEL.CLIP_ARCH.TEXT_LAYERS = 0
_C.MODEL.NECK = "bnneck"
_C.MODEL.IF_WITH_CENTER = "no"
_C.MODEL.ID_LOSS_TYPE = "softmax"
_C.MODEL.ID_LOSS_WEIGHT = 1.0
_C.MODEL.TRIPLET_LOSS_WEIGHT = 1.0
_C.MODEL.I2T_LOSS_WEIGHT = 1.0
_C.MODEL.METRIC_LOSS_TYPE = "triplet"   # 'triplet' or 'triplet_center'
_C.MODEL.DIST_TRAIN = False            # torchrun + DistributedDataParallel (NCCL on CUDA, gloo on CPU)
_C.MODEL.DIST_TIMEOUT = 30.0           # minutes a collective may wait before the job fails
_C.MODEL.NO_MARGIN = False              # soft-margin triplet when True
_C.MODEL.IF_LABELSMOOTH = "on"
_C.MODEL.COS_LAYER = False
_C.MODEL.DROP_PATH = 0.1
_C.MODEL.DROP_OUT = 0.0
_C.MODEL.ATT_DROP_RATE = 0.0
_C.MODEL.TRANSFORMER_TYPE = "None"
_C.MODEL.STRIDE_SIZE = [16, 16]
_C.MODEL.SIE_COE = 3.0
_C.MODEL.SIE_CAMERA = False
_C.MODEL.SIE_VIEW = False
# Self-supervision switches (published README).
_C.MODEL.USE_SSL_STAGE1 = True          # language self-supervision in stage 1
_C.MODEL.USE_SSL = True                 # vision self-supervision in stage 2
_C.MODEL.SSL_TYPE = "SIMCLR"            # 'SIMCLR' or 'SIMSIAM'
_C.MODEL.SSL_HIDDEN_DIM = 4096          # SimCLR projection MLP hidden width
_C.MODEL.SSL_OUT_DIM = 256              # SimCLR projection MLP output width
_C.MODEL.SSL_TEMPERATURE = 0.1
_C.MODEL.SSL_SYNC_BN = False            # SyncBatchNorm in the SSL heads under DDP
# The published code leaves the text SSL MLP out of the stage-1 optimiser; True trains it.
_C.MODEL.TRAIN_TEXT_MLP_STAGE1 = False
# The base flavour: image-encoder fine-tuning only (no prompts, no stage 1, no I2T loss).
_C.MODEL.PROMPT_LEARNING = True

# ----------------------------------------------------------------------------- INPUT
_C.INPUT = CN()
_C.INPUT.SIZE_TRAIN = [256, 128]
_C.INPUT.SIZE_TEST = [256, 128]
_C.INPUT.PROB = 0.5                     # horizontal flip probability
_C.INPUT.RE_PROB = 0.5                  # random erasing probability
_C.INPUT.PIXEL_MEAN = [0.5, 0.5, 0.5]
_C.INPUT.PIXEL_STD = [0.5, 0.5, 0.5]
_C.INPUT.PADDING = 10

# ----------------------------------------------------------------------------- DATASETS
_C.DATASETS = CN()
_C.DATASETS.NAMES = "market1501"
_C.DATASETS.ROOT_DIR = "../data"
_C.DATASETS.VEHICLEID_TEST_SIZE = 800   # 800 / 1600 / 2400
_C.DATASETS.VEHICLEID_TRIALS = 10       # random query/gallery splits averaged at test time
# Splits that differ from the benchmark's published statistics (identities, images, cameras): a warning;
# True makes it an error (datasets/bases.py, check_published_statistics)
_C.DATASETS.STRICT_STATS = False

# ----------------------------------------------------------------------------- DATALOADER
_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = -1         # -1: min(8, cores per local process - 1)
_C.DATALOADER.SAMPLER = "softmax_triplet"
_C.DATALOADER.NUM_INSTANCE = 4
_C.DATALOADER.READ_RETRIES = 3          # bounded retries for an unreadable image

# ----------------------------------------------------------------------------- SOLVER
_C.SOLVER = CN()
_C.SOLVER.SEED = 1234
_C.SOLVER.MARGIN = 0.3
# torch.compile of the model for training and evaluation (processor/compiled.py, docs/speed.md):
# faster steps after a first compiled step of about a minute per kind of step on a GPU.
_C.SOLVER.COMPILE = False
# Deterministic algorithms (torch.use_deterministic_algorithms, cuBLAS workspace, no cuDNN autotuning):
# a CUDA run then repeats bit for bit on the same GPU model and software, at some speed (docs/usage.md).
_C.SOLVER.DETERMINISTIC = False

_C.SOLVER.STAGE1 = CN()
_C.SOLVER.STAGE1.IMS_PER_BATCH = 64
_C.SOLVER.STAGE1.OPTIMIZER_NAME = "Adam"
_C.SOLVER.STAGE1.MAX_EPOCHS = 120
_C.SOLVER.STAGE1.BASE_LR = 3.5e-4
_C.SOLVER.STAGE1.MOMENTUM = 0.9
_C.SOLVER.STAGE1.WEIGHT_DECAY = 1e-4
_C.SOLVER.STAGE1.WEIGHT_DECAY_BIAS = 1e-4
_C.SOLVER.STAGE1.BIAS_LR_FACTOR = 1.0
_C.SOLVER.STAGE1.GAMMA = 0.1
_C.SOLVER.STAGE1.STEPS = (40, 70)
_C.SOLVER.STAGE1.WARMUP_FACTOR = 0.01
_C.SOLVER.STAGE1.WARMUP_EPOCHS = 5
_C.SOLVER.STAGE1.WARMUP_LR_INIT = 1e-5
_C.SOLVER.STAGE1.LR_MIN = 1e-6
_C.SOLVER.STAGE1.WARMUP_ITERS = 500
_C.SOLVER.STAGE1.WARMUP_METHOD = "linear"
_C.SOLVER.STAGE1.COSINE_MARGIN = 0.5
_C.SOLVER.STAGE1.COSINE_SCALE = 30
_C.SOLVER.STAGE1.CHECKPOINT_PERIOD = 120
_C.SOLVER.STAGE1.LOG_PERIOD = 50
_C.SOLVER.STAGE1.EVAL_PERIOD = 120
_C.SOLVER.STAGE1.SSL_LOSS_WEIGHT = 0.8
_C.SOLVER.STAGE1.PROMPT_AUG_METHOD = "mask"   # 'mask', 'swap' or 'mix'
_C.SOLVER.STAGE1.PROMPT_AUG_SCALE = 0.5

_C.SOLVER.STAGE2 = CN()
_C.SOLVER.STAGE2.IMS_PER_BATCH = 64
_C.SOLVER.STAGE2.OPTIMIZER_NAME = "Adam"
_C.SOLVER.STAGE2.MAX_EPOCHS = 60
_C.SOLVER.STAGE2.BASE_LR = 5e-6
_C.SOLVER.STAGE2.LARGE_FC_LR = False
_C.SOLVER.STAGE2.BIAS_LR_FACTOR = 2.0
_C.SOLVER.STAGE2.MOMENTUM = 0.9
_C.SOLVER.STAGE2.CENTER_LR = 0.5
_C.SOLVER.STAGE2.CENTER_LOSS_WEIGHT = 0.0005
_C.SOLVER.STAGE2.WEIGHT_DECAY = 1e-4
_C.SOLVER.STAGE2.WEIGHT_DECAY_BIAS = 1e-4
_C.SOLVER.STAGE2.GAMMA = 0.1
_C.SOLVER.STAGE2.STEPS = (30, 50)
_C.SOLVER.STAGE2.WARMUP_FACTOR = 0.1
_C.SOLVER.STAGE2.WARMUP_EPOCHS = 5
_C.SOLVER.STAGE2.WARMUP_LR_INIT = 0.01
_C.SOLVER.STAGE2.LR_MIN = 1.6e-5
_C.SOLVER.STAGE2.WARMUP_ITERS = 10
_C.SOLVER.STAGE2.WARMUP_METHOD = "linear"     # 'linear' or 'constant'
_C.SOLVER.STAGE2.COSINE_MARGIN = 0.5
_C.SOLVER.STAGE2.COSINE_SCALE = 30
_C.SOLVER.STAGE2.CHECKPOINT_PERIOD = 60
_C.SOLVER.STAGE2.LOG_PERIOD = 50
_C.SOLVER.STAGE2.EVAL_PERIOD = 60
_C.SOLVER.STAGE2.SSL_LOSS_WEIGHT = 0.8

# ----------------------------------------------------------------------------- TEST
_C.TEST = CN()
_C.TEST.IMS_PER_BATCH = 64
_C.TEST.RE_RANKING = False
_C.TEST.RE_RANKING_K1 = 20
_C.TEST.RE_RANKING_K2 = 6
_C.TEST.RE_RANKING_LAMBDA = 0.3
_C.TEST.WEIGHT = ""
_C.TEST.NECK_FEAT = "before"        # 'before' or 'after' the BNNeck
_C.TEST.FEAT_NORM = "yes"           # L2-normalise features before the distance
_C.TEST.DIST_METRIC = "euclidean"   # 'euclidean' (squared) or 'cosine'
_C.TEST.MAX_RANK = 50
_C.TEST.DIST_MAT = "dist_mat.npy"
_C.TEST.EVAL = True
# Evaluation pictures (test_svllreid.py): CMC curve + ranked lists of the N worst and N best
# queries by AP, written into the results folder (visualize/).
_C.TEST.VISUALIZE = False
_C.TEST.VISUALIZE_N = 10            # N worst and N best queries
_C.TEST.VISUALIZE_TOPK = 10         # gallery entries shown per query
# Side-information (camera/view) embedding at test time, for a model trained with SIE:
# 'auto' uses it when the test set is the checkpoint's own training dataset and its camera/view
# ids fit the table (cross-dataset evaluation leaves it out); 'yes' / 'no' force the choice.
_C.TEST.USE_SIE = "auto"

# ----------------------------------------------------------------------------- misc
_C.OUTPUT_DIR = "output"

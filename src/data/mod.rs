//! Datasets: IDX (MNIST, Fashion-MNIST), CIFAR-10 binary, image folders.
